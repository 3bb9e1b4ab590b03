# Every stage: `make <stage> ARGS="key=value ..."` runs `python -m src.<pkg>.<stage> key=value ...`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FONTS := $(VENV)/.fonts
ARGS ?=
NPROC ?= 2 # processes for `make train-ddp` (GPUs on a CUDA box)

.PHONY: setup browser test lint benchmark demo preprocess check split convert demo-data train train-ddp export \
        bench infer check_errors test_batching ov_int8 save_official demo-ui demo-seg demo-time

setup: $(STAMP) $(FONTS)

# torch first (the CPU wheel here, the CUDA build on a GPU machine), then the rest, so nothing pulls a
# second torch.
$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	# TrackEval (MOTChallenge metrics for benchmarks/tracking.py) without its opencv-python dependency, a
	# second OpenCV that would overwrite the headless cv2 above; the metrics only need numpy and scipy.
	$(PY) -m pip install -q --no-deps "trackeval>=1.3,<2"
	touch $(STAMP)

# Debian's fonts-droid-fallback draws CJK class names on pictures (DejaVu Sans, from matplotlib, covers Latin,
# Greek, Cyrillic...). Tried once; without root/apt such names are drawn as boxes and the log names the characters.
$(FONTS): | $(STAMP)
	@[ -f /usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf ] || { [ "$$(id -u)" = 0 ] && \
	  command -v apt-get >/dev/null 2>&1 && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install \
	  -y -qq --no-install-recommends fonts-droid-fallback >/dev/null; } || \
	  echo "fonts-droid-fallback not installed: CJK class names are drawn as boxes on pictures"
	@touch $@

# Debian's chromium drives the Gradio UI test through Playwright (never `playwright install`).
# Without root/apt it is skipped and the browser test says so.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium \
	  >/dev/null; } || echo "chromium not installed: the browser test will be skipped"

# One pytest process (the exit-139 crash that split it was OpenVINO's signal stack: docs/notes/openvino_signal_stack.md).
test: setup browser
	$(PY) -m pytest -q tests $(ARGS)

lint: setup
	$(PY) -m ruff check src tests benchmarks

benchmark: setup
	$(PY) -m benchmarks.run $(ARGS)

# The main job on the embedded default: synthetic demo data -> split -> train -> export -> bench -> infer.
# DEMO_TRAIN: the demo's from-scratch recipe (100 queries, every sample a mosaic, MAL, background queries
# weighted 2x, LR 2e-3), explained in docs/training.md (Recipes); its accuracy and where make demo's minutes
# go: docs/benchmarks.md (make demo), reproduced by `make demo-time`.
DEMO_TRAIN ?= model.num_queries=100 train.epochs=16 train.mosaic.prob=1.0 train.cls_loss=mal \
	train.bg_loss_weight=2 train.lrs.n.base_lr=0.002 train.lrs.n.backbone_lr=0.002
demo: setup
	$(PY) -m src.etl.make_demo_data $(ARGS)
	$(PY) -m src.etl.split $(ARGS)
	$(PY) -m src.dl.train train.overwrite=true $(DEMO_TRAIN) $(ARGS)  # re-running the demo replaces output/demo
	$(PY) -m src.dl.export $(ARGS)
	$(PY) -m src.dl.bench $(ARGS)
	$(PY) -m src.dl.infer $(ARGS)
	@echo ""
	@echo "make demo is done. Where to look next (exp_name=demo; another exp_name in ARGS: output/<exp_name>/):"
	@echo "  output/demo/                     the experiment: metrics.csv (val/test mAP), curves.png, best.pt, exports, bench.csv"
	@echo "  output/demo/infer/demo/images/   the annotated pictures (videos/: the demo videos; crops/, labels/)"
	@echo "  make demo-ui                     the web demo on this model: http://127.0.0.1:7860"
	@echo "  your own data: data/my_set/images + labels (YOLO txt), class names in config.yaml (label_to_name), then"
	@echo "    make split ARGS=\"data_path=data/my_set\" && make train ARGS=\"data_path=data/my_set exp_name=my_run\""
	@echo "    (README.md: Your own data in five commands)"

# make demo once per training seed, timed stage by stage (wall, CPU seconds, load): the tables of
# docs/benchmarks.md (make demo). DEMO_SEEDS=42,1 by default.
DEMO_SEEDS ?= 42,1
demo-time: setup
	$(PY) -m benchmarks.demo_time --seeds $(DEMO_SEEDS) --make=VENV=$(VENV) --make=-osetup

# The same pipeline for instance segmentation: the demo shapes written as YOLO-seg polygons into their own
# data folder, a segmentation D-FINE-N trained with the demo recipe, exported with its mask output,
# benched (box + mask mAP) and run on the demo images/video (masks drawn, polygons written).
DEMO_SEG ?= data_path=data/demo_seg exp_name=demo_seg demo_data.polygons=true model.task=segment
demo-seg: setup
	$(PY) -m src.etl.make_demo_data $(DEMO_SEG) $(ARGS)
	$(PY) -m src.etl.split $(DEMO_SEG) $(ARGS)
	$(PY) -m src.dl.train train.overwrite=true $(DEMO_TRAIN) $(DEMO_SEG) $(ARGS)
	$(PY) -m src.dl.export $(DEMO_SEG) $(ARGS)
	$(PY) -m src.dl.bench $(DEMO_SEG) $(ARGS)
	$(PY) -m src.dl.infer $(DEMO_SEG) $(ARGS)

preprocess: setup
	$(PY) -m src.etl.preprocess $(ARGS)
check: setup
	$(PY) -m src.etl.check $(ARGS)
split: setup
	$(PY) -m src.etl.split $(ARGS)
convert: setup
	$(PY) -m src.etl.convert $(ARGS)
demo-data: setup
	$(PY) -m src.etl.make_demo_data $(ARGS)
train: setup
	$(PY) -m src.dl.train $(ARGS)
train-ddp: setup
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m src.dl.train $(ARGS)
export: setup
	$(PY) -m src.dl.export $(ARGS)
bench: setup
	$(PY) -m src.dl.bench $(ARGS)
infer: setup
	$(PY) -m src.dl.infer $(ARGS)
check_errors: setup
	$(PY) -m src.dl.check_errors $(ARGS)
test_batching: setup
	$(PY) -m src.dl.test_batching $(ARGS)
ov_int8: setup
	$(PY) -m src.dl.ov_int8 $(ARGS)
save_official: setup
	$(PY) -m src.dl.save_official $(ARGS)
demo-ui: setup
	$(PY) -m src.demo.app $(ARGS)
