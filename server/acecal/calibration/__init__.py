"""acecal.calibration"""
