"""The training core: config resolution, optimizer, pure train/eval steps over a mesh, the loop and its listeners."""
