"""acecal.api"""
