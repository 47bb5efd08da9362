"""A plugin written against ``gptstore.plugin`` alone, with all four extension points."""
