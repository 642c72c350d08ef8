"""acecal.data"""
