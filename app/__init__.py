"""The browser app: python -m app (Gradio)."""
