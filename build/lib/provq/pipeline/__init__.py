"""The drivers' room: what demo.py and ``python -m provq.ablation`` share.

    commands.py  each stage as the command a user would type, run unless its output exists
    report.py    JSONL curves, plots and Markdown tables of the reports
"""
