"""The app's code, laid out as MONAI Label's sample apps (configs/, infers/)."""
