"""Models. Each class declares the data tasks it can learn (`tasks`) and sizes itself from the data
(`from_data`), so `configs/model/<name>.yaml` holds only what a user chooses (width, depth, ...)."""
