"""SGLang's served model classes with a load_weights that takes lossless weight deltas (served.py), and the delta
format both sides share (codec.py). SGLang imports every module here and serves the classes of `EntryClass`."""
