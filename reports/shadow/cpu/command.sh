# The torch run shadowed: a copy of the nightly cpu profile's reference run (seed 0), taken from
# runs/nightly/cpu/torch-seed0 once it had finished (its nightly_run.json has the train command).
OMP_NUM_THREADS=1 .venv/bin/rtdetr-parity shadow runs/shadow/cpu-torch-seed0 --every 2 --out reports/shadow/cpu
# The fire drill on the same run (fault applied to the Jittor side of each shadow step):
OMP_NUM_THREADS=1 .venv/bin/rtdetr-parity shadow runs/shadow/cpu-torch-seed0 --every 25 --fault bn-momentum --out reports/shadow/cpu/fault-bn-momentum
