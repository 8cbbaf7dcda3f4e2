"""LoRA-FAIR and the other aggregators of this project as a Flower app (Message API)."""
