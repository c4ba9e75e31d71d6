"""python -m stages.lib.scoring: build METEOR's paraphrase-table index now (e.g. in setup), not on the first scoring."""
from stages.lib.scoring.paraphrase import PARAPHRASE_TABLE, ensure_index

print(ensure_index(PARAPHRASE_TABLE))
