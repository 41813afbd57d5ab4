"""SparseDrive (swc-17/SparseDrive, small): Sparse4D detection + online map + motion and planning."""
