"""What to write, decided before writing (pure): recipes, mergekit configs, the plan, the layout, plan files."""
