"""`prep`: turn folders of edit pairs into the cache that `train` reads (see DESIGN.md)."""
