"""Calibration data: sources (files, images, random, loader scripts) as an iterator of validated feeds."""
