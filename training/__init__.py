"""MedReasoner trainers (GRPO, SFT) and bundle export; adapters over the medreasoner core."""
