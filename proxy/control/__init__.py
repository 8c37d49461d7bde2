"""The control plane: the active rules, the one step that installs a rule set, reloads, the file watcher and the ramp clock."""
