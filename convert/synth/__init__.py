"""The synthetic medical-image question set (drawn images, fixed answers)."""
