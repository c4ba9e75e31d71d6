"""Library modules the DVC stages share; none of them is a stage or imports one."""
