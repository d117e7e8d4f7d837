"""The planner's parts (``patterncc.planner`` drives them): the plan and its
cost model (``model``), decomposition into pieces with their token orders
(``decompose``), each piece over its slots (``reorder``), and the closed-form
layout of gathered columns (``columns``)."""
