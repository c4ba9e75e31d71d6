"""DVC stages of the LoRA-on-E2E reproduction: one module per stage, shared helpers beside them."""
