"""Everything that speaks mergekit: its rules, its merge methods, diagnosis, simulation and recommendations."""
