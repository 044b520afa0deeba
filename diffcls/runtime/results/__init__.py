"""Results out: the resumable results file and its writer thread, output paths that never destroy a user's file, shards and their merge."""
