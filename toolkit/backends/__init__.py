"""What the back-ends need, in one place: one process, DDP, DeepSpeed, FSDP, SLURM, precision.

`accelerator` builds the Accelerator (setup) and applies what each distributed type needs before
the wrap (DDP's unused-parameter probe, DeepSpeed's micro batch and clipping, FSDP's wrap classes)
and says what to clip under each (the policies a back-end refuses are Policy.check_backend's);
`precision` the mixed-precision choice per device and launcher, TF32 and the build's GPU kernels;
`distributed` the process-group timeouts and the data phase's gloo group; `cluster` the SLURM /
torchrun / accelerate environment; `preemption` stop requests (signals, stop file). May import
core, output and policy; the engine and the commands import it.
"""
