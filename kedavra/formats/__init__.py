"""File formats users meet: A1111's PNG generation parameters (`png_info`) and image grids (`grid`)."""
