"""Where code runs: the device, torch.distributed ranks, and relaunching a stage under torchrun."""
