"""The browser app: python -m provq.app (Gradio)."""
