"""Shadow deployment: the stage's entry points (`stage`: deploy, end, compare-and-report, apply
the decision), its config (`config`), deployment rows (`deployments`), the comparison and decision
(`compare`), the pairwise judge of mirrored pairs (`pairwise`), the report (`report`), its
statistics (`stats`) and the traffic simulator (`simulate`).
"""
