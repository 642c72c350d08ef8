"""acecal.losses"""
