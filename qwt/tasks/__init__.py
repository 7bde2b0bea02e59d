"""Task families: data + evaluator. Classification now; detection, zero-shot, generation and
language add a module here each."""
