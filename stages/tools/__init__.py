"""Commands run by hand beside the pipeline (not DVC stages): sweep tables, PEFT export, the demo's base."""
