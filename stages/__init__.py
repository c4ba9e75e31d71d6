"""The DVC stages of the LoRA-on-E2E reproduction, one module per stage (dvc.yaml runs `python -m stages.<name>`).

`stages/lib/` holds the library the stages share (LoRA, the beam searches, the scorer, params); `stages/tools/` the
commands run by hand beside the pipeline (sweep tables, PEFT export, the demo's stand-in base).
"""
