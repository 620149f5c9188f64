"""Shadow deployment: deployment rows, the champion/challenger comparison report and decision
(`stage`), its statistics (`stats`) and the traffic simulator (`simulate`).
"""
