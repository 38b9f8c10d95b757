"""The training loop and what only it needs: the loop itself (`train`), the run in a process (`process`),
the resume checks, `init_from` and the FLOP count behind MFU."""
