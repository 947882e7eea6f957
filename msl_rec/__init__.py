"""msl-rec: LLMs as sequential recommenders with the Masked Softmax Loss."""
