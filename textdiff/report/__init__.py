"""`textdiff report`: the ablation table and the label-efficiency curves from DVC experiments."""
