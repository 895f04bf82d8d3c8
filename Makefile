# Two commands from a fresh clone:  make demo  (prepare, train tiny, sample)  and  make test.
# The data mirror: $CMED_DATA if set, else ../shared/data if present, else the public download.
CMED_DATA ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)
export CMED_DATA
PY := .venv/bin/python
PROMPT ?= 孩子发烧三天了，咳嗽有痰，需要去医院吗？

.venv/installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -q -r requirements.txt
	touch $@

install: .venv/installed

test: .venv/installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

data/pretrain/meta.json: | .venv/installed
	$(PY) -m prepare.pretrain

data/%/meta.json: data/pretrain/meta.json
	$(PY) -m prepare.$*

# experiments/reproduce.py's Table 3: general news text, an equal number of characters of medical text (an even sample of
# data/pretrain's sources), both with data/pretrain's tokenizer so that both fine-tune on the same example sets;
# and IMCS-21 with lexicon entity tags instead of its gold ones
data/general/meta.json: data/pretrain/meta.json
	$(if $(CMED_DATA),,$(error data/general is built from the data mirror's general_zh/ (no public download is wired): set CMED_DATA))
	$(PY) -m prepare.pretrain --corpus $(CMED_DATA)/general_zh --txt_document=line --tokenizer=data/pretrain/tokenizer.model --out data/general

data/medical_equal/meta.json: data/general/meta.json
	$(PY) -m prepare.pretrain --tokenizer=data/pretrain/tokenizer.model --out data/medical_equal \
		--train_chars=$$($(PY) -c "import json; print(json.load(open('data/general/meta.json'))['splits']['train']['input_chars'])")

data/imcs_lexicon/meta.json: data/pretrain/meta.json
	$(PY) -m prepare.imcs --lexicon_entities --out data/imcs_lexicon

data: data/pretrain/meta.json data/covid/meta.json data/dxy/meta.json data/department/meta.json data/imcs/meta.json \
	data/general/meta.json data/medical_equal/meta.json data/imcs_lexicon/meta.json

demo: data/pretrain/meta.json
	$(PY) train.py config/tiny.py --overwrite
	$(PY) sample.py --out_dir=out/tiny --prompt="$(PROMPT)" --max_new_tokens=120
	$(PY) sample.py --out_dir=out/tiny --dialogue --prompt="$(PROMPT)" --max_new_tokens=120

reproduce-quick: data
	$(PY) -m experiments.reproduce --quick

.PHONY: install test data demo reproduce-quick
