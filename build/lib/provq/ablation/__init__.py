"""ProVQ-versus-VQ ablation: python -m provq.ablation."""
