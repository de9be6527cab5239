"""ProVQ-versus-VQ ablation: python -m ablation."""
