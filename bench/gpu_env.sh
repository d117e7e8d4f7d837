# Sourced by the GPU scripts: make patterncc importable on the device machine
# (python3 with torch and triton; lark carried as a wheel in .whl/) and record
# the environment. Sets PKGROOT (a directory whose patterncc/ is the package)
# and writes $OUT/environment.txt.
python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
PKGROOT=$PWD
if ! python3 -c "import patterncc.backends.triton, patterncc.backends.reference, patterncc.grammar" 2>/dev/null; then
    # From a source tree, backends/ and grammar/ are not yet patterncc.backends
    # and patterncc.grammar (pyproject's package-dir maps them at install time):
    # lay the package out as installed, in /tmp.
    rm -rf /tmp/pcc && mkdir -p /tmp/pcc
    cp -r patterncc /tmp/pcc/patterncc
    cp -r backends /tmp/pcc/patterncc/backends
    cp -r grammar /tmp/pcc/patterncc/grammar
    export PYTHONPATH=/tmp/site:/tmp/pcc:$PWD
    PKGROOT=/tmp/pcc
fi
mkdir -p "$OUT"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
    | tee "$OUT/environment.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv >> "$OUT/environment.txt" 2>/dev/null
