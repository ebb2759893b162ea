"""Triton kernels and launchers of manualbp (installed as ``manualbp.triton_kernels``)."""
