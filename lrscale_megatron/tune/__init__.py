"""``lrscale tune``: target train config -> proxy ladder -> sweep -> law -> the target's peak LR."""
