"""What training draws for people to look at (PNG grids of previews, loss.png): the one place in `train`
that imports an image library; it draws outputs, never reads a training image."""
