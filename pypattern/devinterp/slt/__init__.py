"""devinterp's ``devinterp.slt`` import paths on pypattern (see :mod:`pypattern.devinterp`)."""
