"""acecal.training"""
