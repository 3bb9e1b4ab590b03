"""Scoring detections against ground truth: COCO mAP, P/R/F1, one-to-one matching, confusion, thresholds."""
