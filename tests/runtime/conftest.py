import torch

# The machine is shared (2 cores, background training): tiny models run fastest on one thread,
# and two intra-op threads contending with other processes make eager torch ~30x slower.
torch.set_num_threads(1)
