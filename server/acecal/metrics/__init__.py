"""acecal.metrics"""
