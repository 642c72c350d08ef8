"""acecal.inference"""
