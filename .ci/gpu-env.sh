# Source from the repository root on the lent GPU (`. .ci/gpu-env.sh`), before a probe or
# benchmark: installs the wheels that `bash ../shared/gpu/prepare-wheels.sh` put in
# .gpu/wheels into /tmp/site, puts them and the checkout on PYTHONPATH, and builds our C
# extensions in place (the CUDA ones build on first use).  `.ci/gpu-run` does the same
# for the GPU tests.  Run calls carry `.gpu` (`carry: [".gpu"]`).
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/wheels/*.whl \
  > /tmp/site-install.log 2>&1 || tail -5 /tmp/site-install.log
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MAX_JOBS=16
python3 setup.py -q build_ext --inplace > /tmp/build_ext.log 2>&1 || tail -20 /tmp/build_ext.log
