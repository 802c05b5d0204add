"""The reproduction study behind `attnmed reproduce`: its configuration (`config`), the pipeline (`reproduce`), what
the pipeline hands the report (`results`), the run folder's layout and readers (`rundata`), the claims it decides
(`claims`) and the report (`report`).
"""
