"""The core helpers every floor uses: one error type, atomic files and digests, the settings rules, τ offsets,
compute precision, the library versions a run records."""
