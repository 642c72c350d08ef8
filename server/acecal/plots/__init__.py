"""acecal.plots"""
